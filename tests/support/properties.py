"""What the property tests (tests/test_properties_*.py) share: the hypothesis profiles, text
that XML can carry, and the time and memory bound every parser of network input must keep.

Profiles: ``sixnet`` (the default: few examples, so the whole property suite stays well under
30 s) and ``thorough`` (many more, by hand: ``HYPOTHESIS_PROFILE=thorough pytest
tests/test_properties_*.py``). Neither keeps an example database in the working tree; a
failure prints the example and a ``@reproduce_failure`` blob instead.
"""

from __future__ import annotations

import os
import time
import tracemalloc
from collections.abc import Callable
from typing import TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

T = TypeVar("T")

settings.register_profile("sixnet", max_examples=60, deadline=None, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "sixnet"))

#: Characters an XML 1.0 document can carry (no C0 controls but tab and newlines, no
#: surrogates, nothing unassigned such as U+FFFE).
xml_characters = st.one_of(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Cn")),
    st.sampled_from("\t\n\r"))
xml_text = st.text(xml_characters, max_size=40)

#: Per call: a parser of network input that takes more CPU time (process time, so a loaded
#: machine does not fail the check), or allocates more Python memory than this plus
#: `BYTES_PER_INPUT_BYTE` times its input, is unbounded for our purposes.
MAX_SECONDS = 0.5
BASE_BYTES = 256 * 1024
BYTES_PER_INPUT_BYTE = 64


def bounded(call: Callable[[], T], input_size: int, *,
            errors: tuple[type[BaseException], ...]) -> T | BaseException:
    """Run `call`; return its result, or the exception of one of `errors` it raised.

    Anything else it raises propagates (the property fails); so does taking more than
    `MAX_SECONDS` or a peak of Python allocations over the bound for `input_size` bytes.
    """
    tracemalloc.start()
    started = time.process_time()
    try:
        outcome: T | BaseException = call()
    except errors as e:
        outcome = e
    finally:
        seconds = time.process_time() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert seconds < MAX_SECONDS, f"took {seconds:.3f} s on {input_size} bytes of input"
    limit = BASE_BYTES + BYTES_PER_INPUT_BYTE * input_size
    assert peak < limit, f"peak {peak} bytes allocated on {input_size} bytes of input"
    return outcome
