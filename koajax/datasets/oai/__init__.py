"""TFDS builder 'oai' (Osteoarthritis Initiative knee radiographs)."""
