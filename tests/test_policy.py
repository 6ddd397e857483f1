"""The authorization table and the start policy, as plain functions.

End to end over TLS, the same rules are checked in tests/test_authz.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.errors import OperationError
from corral.identity import Identity
from corral.job import MIN_MEMORY, Limits, host_cpus
from corral.protocol import ErrorCode
from corral.supervisor.policy import (
    TABLE,
    USER_PIDS,
    USER_QUOTA_PIDS,
    Caps,
    Policy,
    PolicyError,
    Reach,
    authorize,
    builtin_user_caps,
    load_policy,
    owner_filter,
)

ADMIN = Identity("root-of-trust", "admin")
ALICE = Identity("alice", "user")
JOB_OPERATIONS = ["start", "list", "status", "wait", "logs", "stop", "remove", "attach", "resize"]

# operation -> (admin's reach, a user's reach): the whole table, written out.
EXPECTED = {
    "info": (Reach.ANY, Reach.OWN),
    "ping": (Reach.ANY, Reach.OWN),
    **{operation: (Reach.ANY, Reach.OWN) for operation in JOB_OPERATIONS},
}
# Operations of admins alone.
ADMINS_ONLY = {"audit": Reach.ANY}


def test_the_table_is_what_we_mean() -> None:
    shared = {op: row for op, row in TABLE.items() if "user" in row}
    assert {op: (row["admin"], row["user"]) for op, row in shared.items()} == EXPECTED
    assert {op: row["admin"] for op, row in TABLE.items() if op not in shared} == ADMINS_ONLY


@pytest.mark.parametrize("operation", sorted(EXPECTED))
def test_every_operation_reaches_as_the_table_says(operation: str) -> None:
    admin, user = EXPECTED[operation]
    assert authorize(ADMIN, operation) is admin
    assert authorize(ALICE, operation) is user
    assert owner_filter(ADMIN, operation) is None
    assert owner_filter(ALICE, operation) == ALICE


@pytest.mark.parametrize(
    ("identity", "operation"),
    [
        (ALICE, "shutdown"),  # an operation the table does not list
        (ADMIN, "shutdown"),
        (Identity("mallory", "operator"), "status"),  # a role it does not know
        (Identity("mallory", ""), "info"),
        (ALICE, "audit"),  # admins alone
    ],
)
def test_what_the_table_does_not_list_is_refused(identity: Identity, operation: str) -> None:
    with pytest.raises(OperationError) as caught:
        authorize(identity, operation)
    assert caught.value.code is ErrorCode.PERMISSION_DENIED


USER_CAPS = Caps(Limits(memory=1 << 30, cpu=2.0, pids=256), max_runtime=3600.0)
POLICY = Policy(
    defaults=Caps(Limits(memory=256 << 20)),
    caps={"user": USER_CAPS},
)


def refused(identity: Identity, **request: object) -> str:
    with pytest.raises(OperationError) as caught:
        POLICY.start_terms(identity, **request)  # type: ignore[arg-type]
    assert caught.value.code is ErrorCode.PERMISSION_DENIED
    return str(caught.value)


def test_a_user_cannot_choose_the_run_as_user() -> None:
    message = refused(ALICE, user="root", limits=Limits(), max_runtime=None)
    assert message == (
        "only an admin may choose the user a job runs as; yours run as a uid of their own (dynamic)"
    )
    # Naming the default is no choice at all.
    assert POLICY.start_terms(ALICE, "dynamic", Limits(), None).user == "dynamic"
    # Nor is root on the host theirs to ask for.
    message = refused(ALICE, user=None, limits=Limits(), max_runtime=None, host_root=True)
    assert message == "only an admin may run a job as root on the host"


def test_an_admin_may_run_as_anyone_and_has_no_cap_unless_set() -> None:
    terms = POLICY.start_terms(ADMIN, "root", Limits(memory=8 << 30, cpu=16.0), None)
    assert (terms.user, terms.limits) == ("root", Limits(memory=8 << 30, cpu=16.0))


@pytest.mark.parametrize(
    ("limits", "max_runtime", "message"),
    [
        (Limits(memory=2 << 30), None, "limits.memory: 2G is over the user cap of 1G"),
        (
            Limits(memory=(1 << 30) + 1),
            None,
            "limits.memory: 1073741825B is over the user cap of 1G",
        ),
        (Limits(cpu=2.5), None, "limits.cpu: 2.5 cores is over the user cap of 2 cores"),
        (Limits(pids=257), None, "limits.pids: 257 is over the user cap of 256"),
        (Limits(), 3601.0, "max_runtime: 3601s is over the user cap of 1h"),
        (Limits(), 86400.0, "max_runtime: 1d is over the user cap of 1h"),
    ],
)
def test_a_user_over_a_cap_is_refused_naming_it(
    limits: Limits, max_runtime: float | None, message: str
) -> None:
    assert refused(ALICE, user=None, limits=limits, max_runtime=max_runtime) == message


def test_defaults_fill_what_a_start_leaves_unset_and_caps_bound_the_rest() -> None:
    terms = POLICY.start_terms(ALICE, None, Limits(cpu=0.5), None)
    # memory: the default; cpu: asked; pids and max runtime: unset, so the cap.
    assert terms.limits == Limits(memory=256 << 20, cpu=0.5, pids=256)
    assert terms.max_runtime == 3600.0
    assert POLICY.start_terms(ALICE, None, Limits(memory=1 << 30), 60).limits.memory == 1 << 30
    # An admin has no caps here: unset stays unset, but defaults apply.
    assert POLICY.start_terms(ADMIN, None, Limits(), None).limits == Limits(memory=256 << 20)


def test_a_policy_from_a_file_with_flags_over_it(tmp_path: Path) -> None:
    config = tmp_path / "corrald.toml"
    config.write_text(
        'default_user = "corral-jobs"\n'
        "[defaults]\n"
        'memory = "512M"\n'
        "pids = 100\n"
        "[caps.user]\n"
        'memory = "2G"\n'
        "cpu = 1\n"
        'max_runtime = "1h"\n'
        'io_write_bps = "10M"\n'
    )
    policy = load_policy(
        config, defaults={"pids": "50"}, caps={"user": {"cpu": "0.5"}}, memory=8 << 30
    )
    assert policy.default_user == "corral-jobs"
    assert policy.defaults == Caps(Limits(memory=512 << 20, pids=50))
    assert policy.caps == {  # the file's memory over the built-in share; its pids kept
        "user": Caps(
            Limits(memory=2 << 30, cpu=0.5, io_write_bps=10 << 20, pids=USER_PIDS),
            max_runtime=3600.0,
        )
    }


def test_with_no_configuration_a_users_job_is_still_bounded_and_an_admins_is_not() -> None:
    policy = load_policy(None, memory=8 << 30)
    assert policy == Policy(
        caps={"user": Caps(Limits(memory=2 << 30, pids=USER_PIDS))},
        quotas={"user": Limits(memory=4 << 30, pids=USER_QUOTA_PIDS)},
    )
    assert builtin_user_caps(8 << 30) == {"pids": 1024, "memory": 2 << 30}
    assert builtin_user_caps(10 << 20)["memory"] >= MIN_MEMORY  # a tiny host: still runnable
    # Unset limits of a user's job become the caps; an admin's stay unset.
    terms = policy.start_terms(ALICE, user=None, limits=Limits(), max_runtime=None)
    assert (terms.limits.pids, terms.limits.memory) == (USER_PIDS, 2 << 30)
    admin_terms = policy.start_terms(ADMIN, user=None, limits=Limits(), max_runtime=None)
    assert admin_terms.limits == Limits()
    # The operator changes them: a flag over the file over the built-ins.
    raised = load_policy(None, caps={"user": {"pids": "100000"}}, memory=8 << 30)
    assert raised.caps["user"].limits.pids == 100000


@pytest.mark.parametrize(
    ("text", "flags", "message"),
    [
        ("[caps.user]\nram = 1\n", {}, "caps.user: unknown limit 'ram'"),
        ("[caps.guest]\ncpu = 1\n", {}, "caps for unknown role 'guest'"),
        ("limits = 1\n", {}, "unknown setting 'limits'"),
        ("[defaults]\nmemory = '1 lot'\n", {}, "defaults: memory: not a size: '1 lot'"),
        ("[defaults]\nmemory = 100\n", {},
         "defaults: limits.memory: must be between 8M and 1P, not 100B"),
        ("[caps.user]\nmax_runtime = -1\n", {},
         "caps.user: max_runtime must be between 1ms and 10y, not -1s"),
        ("[caps.user]\nmax_runtime = '11y'\n", {},
         "caps.user: max_runtime must be between 1ms and 10y, not 11y"),
        ("[defaults]\ncpu = true\n", {}, "defaults: cpu must be a number of cores, not true"),
        ("[defaults]\nmemory = [1]\n", {},
         "defaults: memory must be a size like 512M or 2G, not a list"),
        ("default_user = 3\n", {}, "default_user must be a user name"),
        ("[caps.user]\nmemory = '1G'\n[defaults]\nmemory = '2G'\n", {},
         "the default memory (2G) is over the user cap (1G)"),
        ("[caps.user]\nmax_runtime = '1h'\n[defaults]\nmax_runtime = '90m'\n", {},
         "the default max_runtime (90m) is over the user cap (1h)"),
        ("", {"defaults": {"cpu": "lots"}}, "defaults: cpu must be a number of cores, not 'lots'"),
        # A whole number is not rounded down from what was written.
        ("", {"defaults": {"pids": "1.5"}}, "defaults: pids must be a whole number, not '1.5'"),
        ("defaults = 3\n", {}, "defaults must be a table, not 3"),
        ("x = [", {}, "corrald.toml: "),
        ("[quota.user]\nio_read_bps = '1M'\n", {},
         "quota.user: 'io_read_bps' is no quota; known: cpu, memory, pids"),
        ("[quota.guest]\npids = 5\n", {}, "quota for unknown role 'guest'"),
        ("", {"quotas": {"user": {"memory": "a lot"}}}, "quota.user: memory: not a size"),
        ("allow_host_root = 'yes'\n", {}, "allow_host_root must be true or false, not 'yes'"),
        ("allow_seccomp_unconfined = 0\n", {},
         "allow_seccomp_unconfined must be true or false, not 0"),
    ],
)  # fmt: skip
def test_a_wrong_policy_is_refused_naming_what(
    tmp_path: Path, text: str, flags: dict[str, dict[str, str]], message: str
) -> None:
    config = tmp_path / "corrald.toml"
    config.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_policy(config, **flags)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_a_policy_may_keep_every_job_under_the_syscall_filter(tmp_path: Path) -> None:
    assert POLICY.start_terms(ADMIN, None, Limits(), None, seccomp="unconfined").seccomp == (
        "unconfined"
    )
    assert POLICY.for_role("admin")["seccomp_unconfined"] is True
    config = tmp_path / "corrald.toml"
    config.write_text("allow_seccomp_unconfined = false\n")
    strict = load_policy(config)
    with pytest.raises(OperationError) as caught:
        strict.start_terms(ADMIN, None, Limits(), None, seccomp="unconfined")
    assert caught.value.code is ErrorCode.PERMISSION_DENIED
    assert str(caught.value) == (
        "this corrald's policy runs every job under the syscall filter "
        "(allow_seccomp_unconfined = false)"
    )
    assert strict.start_terms(ADMIN, None, Limits(), None).seccomp == "default"
    assert strict.for_role("admin")["seccomp_unconfined"] is False
    # A user is refused for being a user, whatever the setting.
    for policy in (POLICY, strict):
        with pytest.raises(OperationError, match="only an admin may run a job without"):
            policy.start_terms(ALICE, None, Limits(), None, seccomp="unconfined")


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"cannot read .*nothing\.toml: No such file"):
        load_policy(tmp_path / "nothing.toml")


def test_writable_places_per_role_from_file_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "policy.toml"
    config.write_text('[writable]\nuser = ["/srv/scratch/"]\n')
    policy = load_policy(config, writable={"user": ["/data"]})
    assert policy.writable == {"admin": ("/",), "user": ("/srv/scratch", "/data")}
    alice = Identity("alice", "user")
    policy.check_writable(alice, ["/srv/scratch", "/srv/scratch/a/../b", b"/data/x"])
    for outside in ["/srv/scratchpad", "/srv", "/srv/scratch/../../etc", "/"]:
        with pytest.raises(OperationError) as caught:
            policy.check_writable(alice, [outside])
        assert caught.value.code is ErrorCode.PERMISSION_DENIED
        assert "allowed: /srv/scratch, /data" in str(caught.value)
    # Configuring admins' places replaces their default of everywhere.
    narrowed = load_policy(None, writable={"admin": ["/srv"]})
    with pytest.raises(OperationError):
        narrowed.check_writable(Identity("root", "admin"), ["/etc"])
    for wrong, words in [
        ('[writable]\nuser = "/srv"\n',
         "writable.user must be a list of absolute paths, not '/srv'"),
        ('[writable]\nuser = ["srv"]\n', "writable.user must be a list of absolute paths, "
         "not one with 'srv'"),
        ('[writable]\nboss = ["/srv"]\n', "writable for unknown role 'boss'"),
    ]:  # fmt: skip
        config.write_text(wrong)
        with pytest.raises(PolicyError) as refused:
            load_policy(config)
        assert str(refused.value).endswith(words)


def test_a_path_outside_the_writable_places_is_named_as_written() -> None:
    policy = load_policy(None, writable={"user": ["/srv"]})
    with pytest.raises(OperationError) as caught:
        policy.check_writable(ALICE, [b"/etc/p\xffth"])
    assert str(caught.value) == (
        "writable: '/etc/p\\xffth' is outside where a user's jobs may write (allowed: /srv)"
    )


# -- the host's CPUs --------------------------------------------------------------------


def test_a_cpu_cap_over_the_hosts_cpus_is_the_hosts_count() -> None:
    """A cap says "at most"; the host says less already. Left over the host,
    it would become the cpu limit of every job that sets none, and each
    such job would be refused."""
    policy = load_policy(None, caps={"user": {"cpu": "8"}, "admin": {"cpu": "1.5"}}, cpus=2)
    assert policy.caps["user"].limits.cpu == 2.0
    assert policy.caps["admin"].limits.cpu == 1.5  # under the host: as written
    terms = policy.start_terms(ALICE, None, Limits(), None)
    assert terms.limits.cpu == 2.0
    # On this host, the same: the cap of 1000 cores is its CPUs.
    assert load_policy(None, caps={"user": {"cpu": "1000"}}).caps["user"].limits.cpu == float(
        host_cpus()
    )


def test_a_cpu_default_over_the_hosts_cpus_is_refused_at_start() -> None:
    """A default is given to every job that sets none: one the host cannot
    give is the operator's mistake, said once at start, not at every start."""
    with pytest.raises(PolicyError) as caught:
        load_policy(None, defaults={"cpu": "3"}, cpus=2)
    assert str(caught.value) == (
        "policy: defaults: limits.cpu: must be at most 2 cores, this host's CPUs, not 3"
    )
    with pytest.raises(PolicyError, match=r"must be at most \d+ cores?, this host's CPUs"):
        load_policy(None, defaults={"cpu": "1000"})


def test_a_users_jobs_together_have_a_quota_unless_configured(tmp_path: Path) -> None:
    policy = load_policy(None, memory=8 << 30)
    assert policy.quota("user") == Limits(pids=USER_QUOTA_PIDS, memory=4 << 30)
    assert policy.quota("admin") == Limits()  # none for admins
    assert policy.for_role("user")["quota"] == {"pids": USER_QUOTA_PIDS, "memory": 4 << 30}
    config = tmp_path / "corrald.toml"
    config.write_text("[quota.user]\nmemory = '2G'\ncpu = 8\n[quota.admin]\npids = 100\n")
    configured = load_policy(config, quotas={"user": {"pids": "50"}}, cpus=2, memory=8 << 30)
    # A cpu quota over the host's CPUs is their count, as a cap is.
    assert configured.quota("user") == Limits(pids=50, memory=2 << 30, cpu=2.0)
    assert configured.quota("admin") == Limits(pids=100)
