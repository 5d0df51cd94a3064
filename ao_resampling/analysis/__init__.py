"""Results in, statistics, figures and reports out. Pure: never imports a stage or the engine."""
