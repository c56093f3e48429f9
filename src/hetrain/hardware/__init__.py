"""hardware subpackage."""
