"""Example plugins shipped with the tap; each is also a template for writing your own."""
