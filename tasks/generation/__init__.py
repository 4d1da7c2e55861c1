"""Generation phase: persona expansion, brainstormed instructions, examples (Prefect task wrappers included)."""
