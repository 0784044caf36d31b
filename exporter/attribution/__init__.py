"""Attribute: pure functions over the readers' plain data that tie each GPU to the pods using it."""
