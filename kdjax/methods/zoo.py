"""Registry entries for the zoo family (see kdjax.methods)."""
