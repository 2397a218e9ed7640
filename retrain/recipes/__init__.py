"""How the shipped reference models were made: `teacher` (behaviour cloning) and `student` (student v0: distil,
prune, quantize). Leaves: nothing imports them but the command line (`flywheel models`)."""
