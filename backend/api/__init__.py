"""The HTTP boundary: the Flask app, its two blueprints (the ML-backend protocol and operations), metrics."""
