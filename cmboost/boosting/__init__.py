"""Boosting generated images: the methods' hyperparameters (config), the methods (methods, apply), the
controls every result must beat, the settings file tune writes (settings), and the boost verb (boost)."""
