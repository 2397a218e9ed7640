"""The retraining side of the flywheel, in rooms: `models/`, `recipes/`, `compress/`, `cycle/`, `jobs/`."""
