"""Registry entries for the kd2m family (see kdjax.methods)."""
