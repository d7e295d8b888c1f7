"""Our Lava Processes (process.py) and their ProcessModels (models.py).

Lava's compiler executes every sibling .py file of a Process's module to find its
models, so this package holds nothing else.
"""
