"""`moe-export inspect` (filled in by the loaders work)."""
