"""The labels (and the snapshot repository) every object this test session creates on a real engine carries.

The engine is shared with other test sessions and supervisors: the session ID
lets the end-of-session sweep, and every "nothing left behind" check, look at
this session's objects only.
"""

from __future__ import annotations

import uuid

SESSION_ID = uuid.uuid4().hex[:12]
# No shared key such as ``snapyard.test=1``: a sweep by it in another session
# (an older checkout) killed this session's running containers.
TEST_LABELS = {"snapyard.test.session": SESSION_ID}
# A snapshot repository of this session's own: a supervisor rebuilds its
# registry from its repository and deletes snapshots of another base there.
SNAPSHOT_REPOSITORY = f"snapyard-test-snapshot-{SESSION_ID}"
