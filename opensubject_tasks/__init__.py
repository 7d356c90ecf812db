"""OpenSubject: videos in, a subject-driven generation and manipulation corpus out."""
__version__ = "0.1.0"
