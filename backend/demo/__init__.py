"""The demo and the local Label Studio it runs on: outside what ``dermassist serve`` imports.

- :mod:`backend.demo.run`: ``dermassist demo`` (the real sample and the released models; ``--synthetic``).
- :mod:`backend.demo.label_studio`: a Label Studio 1.23.2 of our own (its venv, a migrated template,
  loopback), for the demo and the end-to-end tests.
- :mod:`backend.demo.study`: simulated dermatologists annotating through Label Studio's API.
- :mod:`backend.demo.processes`: starting and stopping ``dermassist serve`` as a child process.

``tests/test_architecture.py`` checks that ``serve`` imports none of this, nor the synthetic generator.
"""
