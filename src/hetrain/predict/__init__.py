"""predict subpackage."""
