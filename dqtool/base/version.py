"""dqtool's version (read by packaging, written into every manifest and report)."""

__version__ = "0.1.0"
