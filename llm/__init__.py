"""The LLM client (OpenAI-compatible, schema-constrained, retried) and its multi-endpoint router."""
