"""Parses Prometheus text exposition with prometheus_client's parser (a real one) and
prints each metric family's name and type, one per line; fails on malformed input.

usage: parse_metrics.py FILE
"""

import sys

from prometheus_client.parser import text_string_to_metric_families

for family in text_string_to_metric_families(open(sys.argv[1]).read()):
    print(family.name, family.type, len(family.samples))
