"""The central enrollment server (people, enrollment, gallery publication, attendance ingest)."""
