"""The edge's gallery: the hnswlib index with exact re-rank and its sync from the server's signed publications."""
