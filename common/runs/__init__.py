"""One command line -> one run: mode dispatch (train / eval / predict / cv / synth), the run folder, config checks
after composition, resolvers, the demo.

May import every other package of common.
"""
