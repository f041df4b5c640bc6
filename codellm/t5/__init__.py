"""T5 / CodeT5+ beyond the model itself (codellm/arch/t5.py): inference in its three modes (`generate.py`)
and the commands that reach them (`cli.py`)."""
