"""Registry entries for the coss family (see kdjax.methods)."""
