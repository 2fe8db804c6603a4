"""The coordinator's record book, without Ray: when a step's record is complete, and which reports count."""

from __future__ import annotations

from raygossip.engines.records import RecordBook, Report


def report(incarnation: int = 0, accuracy: float = 0.5) -> Report:
    return Report(accuracy, {}, 1.0, {"bytes_sent": 0, "messages_sent": 0}, incarnation)


def test_a_step_is_complete_once_every_live_agent_reported_it_and_is_taken_once():
    book = RecordBook()
    assert not book.add(0, 9, report(), live=[0, 1, 2])
    assert not book.add(2, 9, report(), live=[0, 1, 2])
    assert book.add(1, 9, report(), live=[0, 1, 2])
    assert sorted(book.take(9)) == [0, 1, 2]
    assert book.take(9) is None  # the supervision loop and the report thread may both try
    assert not book.add(1, 9, report(incarnation=1), live=[0, 1, 2])  # a restarted agent's repeat is ignored
    assert book.done([9]) and not book.done([9, 19])


def test_a_dropped_agent_completes_the_steps_the_others_reported():
    book = RecordBook()
    for agent in (0, 1):
        book.add(agent, 9, report(), live=[0, 1, 2])
    book.add(0, 19, report(), live=[0, 1, 2])
    assert book.complete(live=[0, 1]) == [9]
    assert book.missing(1) == [19] and book.missing(0) == []


def test_a_dead_lifes_late_report_never_replaces_a_newer_lifes():
    book = RecordBook()
    book.add(0, 9, report(incarnation=1, accuracy=0.9), live=[0, 1])
    book.add(0, 9, report(incarnation=0, accuracy=0.1), live=[0, 1])
    book.add(1, 9, report(), live=[0, 1])
    assert book.take(9)[0].accuracy == 0.9


def test_a_resumed_run_ignores_steps_before_its_checkpoint_and_records_stay_in_step_order():
    book = RecordBook(resumed_from=12)
    assert not book.wants(11) and book.wants(12)
    assert not book.add(0, 11, report(), live=[0])
    book.publish({"step": 24})
    book.publish({"step": 12})
    assert [r["step"] for r in book.records] == [12, 24]
    assert [r["step"] for r in book.delivered] == [24, 12]  # poll hands them out in the order they were made
