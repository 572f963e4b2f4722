"""`doctor` says, before any task is REJECTED, that the policy allows nothing and that
signatures are off (issue 20 item 8)."""

from __future__ import annotations

from fem_ansible.doctor import check_policy, check_signatures


def test_empty_allow_lists_and_no_signatures_are_warnings(make_config):
    empty = {"images": {"allow": []}, "sources": {"allow": []}, "downloads": {"allow": []},
             "uploads": {"allow": []}}
    config = make_config(policy=empty)
    (policy,) = check_policy(config)
    assert policy.status == "warn" and "every task will be REJECTED" in policy.detail
    assert "policy.uploads.allow" in policy.detail and policy.fix
    (signatures,) = check_signatures(config)
    assert signatures.status == "warn" and "mode is none" in signatures.detail


def test_some_empty_allow_lists_say_which_tasks_are_rejected(make_config):
    config = make_config(policy={"images": {"allow": ["127.0.0.1:5000/**"]},
                                 "sources": {"allow": []}})
    (policy,) = check_policy(config)
    assert policy.status == "warn" and "policy.sources.allow is empty" in policy.detail
    assert "images" not in policy.detail


def test_a_policy_that_allows_is_ok(make_config):
    (policy,) = check_policy(make_config())
    assert policy.status == "ok" and "1 images" in policy.detail
