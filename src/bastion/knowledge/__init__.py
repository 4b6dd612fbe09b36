"""Knowledge base: tenant-isolated ingestion and retrieval (CHECKLIST R3)."""
