"""Development tools that run from a checkout (``python -m tools.<name>`` from its root); not part of the
package: the wheel and the sdist carry neither this folder nor anything from it."""
