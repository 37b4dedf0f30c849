"""The Triton side of throttllem: the Python-backend model, its engines and the digital twin."""
