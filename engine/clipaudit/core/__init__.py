"""Small helpers every other package may use (no clipaudit imports)."""
