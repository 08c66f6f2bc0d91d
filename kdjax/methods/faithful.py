"""Registry entries for faithful distillation (see kdjax.methods, kdjax.faithfulness)."""
