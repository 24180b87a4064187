"""Coverage-guided fuzzing of the guest-facing parsers (atheris); see README."""
