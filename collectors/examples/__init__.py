"""Example collectors: templates for your own."""
