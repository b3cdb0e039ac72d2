"""The command layer: one module per verb of the ``lmforge`` command.

Each command is a typed function whose parameters are its flags and whose docstring is its help
(``lmforge.commands.arguments``). A command checks its input, calls the library below and prints
for the user; nothing below this package imports it. ``lmforge.cli`` maps verbs to commands.
"""
