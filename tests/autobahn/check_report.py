"""Check an Autobahn fuzzingclient report (index.json) and print a summary.

Usage: check_report.py SPEC_JSON REPORT_DIR

Exit status: 0 when every expected case ran and passed, 1 when a case failed
or is missing, 2 when the report cannot be read.

A case passes when its `behavior` is OK, NON-STRICT or INFORMATIONAL and its
`behaviorClose` is OK or INFORMATIONAL. The expected case list is computed
from the spec with the test suite's own pattern matcher when the suite is
importable (run.sh runs this under the suite's Python 2.7); otherwise only the
cases present in the report are checked. Runs on Python 2.7 and 3.
"""
from __future__ import print_function

import json
import os
import sys

PASS_BEHAVIOR = ("OK", "NON-STRICT", "INFORMATIONAL")
PASS_CLOSE = ("OK", "INFORMATIONAL")


def case_key(case_id):
    return tuple(int(x) for x in case_id.split("."))


def expected_cases(spec):
    try:
        from autobahntestsuite.case import (Cases, CaseSetname, CaseBasename,
                                            CaseCategories, CaseSubCategories)
        from autobahntestsuite.caseset import CaseSet
    except Exception as e:  # not run under the suite's environment
        print("check_report: cannot import autobahntestsuite (%s); "
              "not checking for missing cases" % e, file=sys.stderr)
        return None
    cs = CaseSet(CaseSetname, CaseBasename, Cases, CaseCategories, CaseSubCategories)
    return cs.parseSpecCases(spec)


def count(values):
    out = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return ", ".join("%s=%d" % (k, out[k]) for k in sorted(out))


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    spec_path, report_dir = argv[1], argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    agent = spec["servers"][0]["agent"]
    index_path = os.path.join(report_dir, "index.json")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (IOError, OSError, ValueError) as e:
        print("autobahn: cannot read %s: %s" % (index_path, e))
        return 2
    results = index.get(agent, {})

    failing = []
    for case_id in sorted(results, key=case_key):
        r = results[case_id]
        if r.get("behavior") not in PASS_BEHAVIOR or r.get("behaviorClose") not in PASS_CLOSE:
            failing.append("%s (behavior=%s, close=%s, code=%s, report=%s)" % (
                case_id, r.get("behavior"), r.get("behaviorClose"),
                r.get("remoteCloseCode"), os.path.join(report_dir, r.get("reportfile", "?"))))

    expected = expected_cases(spec)
    missing = []
    if expected is not None:
        missing = [c for c in expected if c not in results]
    elif not results:
        missing = ["(no cases in report)"]

    print("autobahn: %d cases run against %s" % (len(results), spec["servers"][0]["url"]))
    print("autobahn: behavior: %s" % (count(r.get("behavior") for r in results.values()) or "-"))
    print("autobahn: behaviorClose: %s" % (count(r.get("behaviorClose") for r in results.values()) or "-"))
    for line in failing:
        print("autobahn: FAIL %s" % line)
    if missing:
        shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        print("autobahn: MISSING %d expected case(s) (server died or refused?): %s" % (len(missing), shown))
    n_failed = len(failing) + len(missing)
    # Plain closing line: "N passed, N failed".
    print("autobahn: %d passed, %d failed" % (len(results) - len(failing), n_failed))
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
