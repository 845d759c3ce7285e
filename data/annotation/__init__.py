"""Pairwise annotation: tasks from runs, the browser app annotators use, its database, and exports to preference data."""
