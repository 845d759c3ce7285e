"""Pairwise annotation: tasks from runs, the browser app annotators use, its database, and exports to preference data.

Its web, database and migration packages are the `annotate` extra. This file and `cli.py` import none
of them, so the core library and `speechrl --help` work without it; the names the CLI's parser needs
live here for that reason.
"""

DEFAULT_URL_ENV = "SPEECHRL_ANNOTATION_DB"  # names the database when --db is not given
STRATEGIES = ("reward_gap", "random", "checkpoints")  # how `annotate tasks` pairs samples (tasks.choose_pairs)
