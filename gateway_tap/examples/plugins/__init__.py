"""Example tap plugins; each is also a template for writing your own."""
