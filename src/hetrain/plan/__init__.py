"""plan subpackage."""
