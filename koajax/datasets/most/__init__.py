"""TFDS builder 'most' (Multicenter Osteoarthritis Study knee radiographs)."""
