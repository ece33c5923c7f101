"""Example collectors; each is also a template for writing your own."""
