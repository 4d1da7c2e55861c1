"""Ground layer: settings, progress, fault points, seeding and secrets; imports nothing of the project."""
