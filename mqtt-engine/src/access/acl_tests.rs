use super::*;
use crate::topic::TopicName;
use proptest::prelude::*;

fn acl(text: &str) -> Acl {
    Acl::parse(text).unwrap()
}

fn errors(text: &str) -> Vec<(usize, usize, String)> {
    Acl::parse(text).unwrap_err().into_iter().map(|e| (e.line, e.column, e.message)).collect()
}

const ANON: Option<&str> = None;

#[test]
fn an_empty_acl_denies_everything() {
    for acl in [Acl::default(), acl(""), acl("# only a comment\n\n   \n")] {
        assert_eq!(acl.rule_count(), 0);
        assert!(!acl.may_read(ANON, "c", "a"));
        assert!(!acl.may_write(Some("u"), "c", "a"));
        assert!(!acl.may_subscribe(ANON, "c", "#"));
        assert!(!acl.grants_anonymous_write());
    }
}

#[test]
fn lines_before_any_user_are_for_anonymous_clients_only() {
    let acl = acl("topic read public/#\nuser alice\ntopic read alice/#\n");
    assert!(acl.may_read(ANON, "c", "public/x"));
    assert!(!acl.may_read(ANON, "c", "alice/x"));
    assert!(acl.may_read(Some("alice"), "c", "alice/x"));
    assert!(!acl.may_read(Some("alice"), "c", "public/x"), "anonymous rules do not apply to users");
    assert!(!acl.may_read(Some("mallory"), "c", "public/x"), "nor to unknown users");
}

#[test]
fn user_blocks_do_not_leak_into_each_other() {
    let acl =
        acl("user alice\ntopic a/#\n\n  user   bob smith  \ntopic b/#\nuser alice\ntopic write more/alice\n");
    assert_eq!(acl.rule_count(), 3);
    assert!(acl.may_write(Some("alice"), "c", "a/1"));
    assert!(!acl.may_write(Some("alice"), "c", "b/1"));
    assert!(acl.may_write(Some("alice"), "c", "more/alice"), "a user named twice gets both blocks");
    assert!(acl.may_write(Some("bob smith"), "c", "b/1"), "a username may hold spaces");
    assert!(!acl.may_write(Some("bob smith"), "c", "a/1"));
    assert!(!acl.may_write(Some("bob"), "c", "b/1"));
    assert!(!acl.may_write(ANON, "c", "a/1"));
}

#[test]
fn each_access_word_grants_what_it_says() {
    let acl = acl("topic read r\ntopic write w\ntopic readwrite rw\ntopic plain\ntopic deny d\n");
    let cases = [
        ("r", true, false),
        ("w", false, true),
        ("rw", true, true),
        ("plain", true, true),
        ("d", false, false),
    ];
    for (topic, read, write) in cases {
        assert_eq!(acl.may_read(ANON, "c", topic), read, "read {topic}");
        assert_eq!(acl.may_subscribe(ANON, "c", topic), read, "subscribe {topic}");
        assert_eq!(acl.may_write(ANON, "c", topic), write, "write {topic}");
    }
    assert!(!acl.may_read(ANON, "c", "other"), "default deny");
}

#[test]
fn filters_may_hold_spaces_after_an_access_word() {
    let acl = acl("topic readwrite my topic/+\npattern read  room %u/#\n");
    assert!(acl.may_write(ANON, "c", "my topic/x"));
    assert!(acl.may_read(Some("ann"), "c", "room ann/x"));
    assert!(!acl.may_read(Some("ann"), "c", "room bob/x"));
}

#[test]
fn deny_overrides_a_broader_allow_whatever_the_order() {
    for text in [
        "user u\ntopic readwrite fieldmq/#\ntopic deny fieldmq/secret/#\n",
        "user u\ntopic deny fieldmq/secret/#\ntopic readwrite fieldmq/#\n",
        "pattern deny fieldmq/secret/#\nuser u\ntopic readwrite fieldmq/#\n",
    ] {
        let acl = acl(text);
        let u = Some("u");
        assert!(acl.may_read(u, "c", "fieldmq/open"));
        assert!(acl.may_write(u, "c", "fieldmq/open"));
        assert!(!acl.may_read(u, "c", "fieldmq/secret/key"), "{text}");
        assert!(!acl.may_write(u, "c", "fieldmq/secret"), "{text}");
        assert!(!acl.may_subscribe(u, "c", "fieldmq/secret/#"), "{text}");
        assert!(!acl.may_subscribe(u, "c", "fieldmq/secret/+"), "{text}");
        // The deny rule covers only part of these: the read check of each
        // message withholds the secret ones.
        assert!(acl.may_subscribe(u, "c", "fieldmq/#"), "{text}");
        assert!(acl.may_subscribe(u, "c", "fieldmq/+/key"), "{text}");
    }
}

#[test]
fn patterns_substitute_the_client_id_and_username() {
    let acl = acl("user alice\ntopic read x\npattern write devices/%c/#\npattern read users/%u/+\n");
    assert!(acl.may_write(ANON, "pump-1", "devices/pump-1/state"), "patterns apply to anonymous clients");
    assert!(acl.may_write(Some("alice"), "pump-1", "devices/pump-1"));
    assert!(acl.may_write(Some("bob"), "pump-1", "devices/pump-1/a/b"), "and to users without a block");
    assert!(!acl.may_write(ANON, "pump-1", "devices/pump-2/state"));
    assert!(!acl.may_write(ANON, "pump", "devices/pump-1/state"));
    assert!(acl.may_read(Some("alice"), "c", "users/alice/inbox"));
    assert!(!acl.may_read(Some("alice"), "c", "users/bob/inbox"));
    assert!(!acl.may_read(Some("alice"), "c", "users/alice"));
    assert!(acl.may_subscribe(Some("alice"), "c", "users/alice/+"));
    assert!(!acl.may_subscribe(Some("alice"), "c", "users/+/+"));
    assert!(!acl.may_read(ANON, "alice", "users/alice/inbox"), "%u never matches an anonymous client");
    assert!(!acl.may_read(ANON, "c", "users//inbox"));
}

#[test]
fn substitutions_may_sit_inside_a_level_and_other_percents_are_text() {
    let acl = acl("pattern read d/dev-%c-%u/x\npattern read p/100%/%c%\n");
    assert!(acl.may_read(Some("u"), "7", "d/dev-7-u/x"));
    assert!(!acl.may_read(Some("u"), "7", "d/dev-7-v/x"));
    assert!(!acl.may_read(Some("u"), "7", "d/dev-7-u-/x"));
    assert!(acl.may_read(ANON, "7", "p/100%/7%"));
}

#[test]
fn ids_and_usernames_that_would_widen_a_pattern_do_not_match() {
    let acl = acl("pattern readwrite devices/%c/#\npattern readwrite users/%u\npattern read %c/#\n");
    for id in ["#", "+", "a/b", "a+", "x#", ""] {
        assert!(!acl.may_write(ANON, id, "devices/x"), "client id {id:?}");
        assert!(!acl.may_write(ANON, id, &format!("devices/{id}")), "client id {id:?}");
        assert!(!acl.may_subscribe(ANON, id, "devices/#"), "client id {id:?}");
    }
    for user in ["#", "+", "a/b", ""] {
        assert!(!acl.may_write(Some(user), "c", &format!("users/{user}")), "user {user:?}");
        assert!(!acl.may_subscribe(Some(user), "c", "users/+"), "user {user:?}");
    }
    // A pattern without the offending substitution still matches.
    assert!(acl.may_write(Some("a/b"), "ok", "devices/ok/x"));
    // A client named `$SYS` does not get `$SYS/#` out of `%c/#`.
    assert!(acl.may_read(ANON, "sensor", "sensor/x"));
    assert!(!acl.may_read(ANON, "$SYS", "$SYS/broker/load"));
    assert!(!acl.may_subscribe(ANON, "$SYS", "$SYS/#"));
}

#[test]
fn dollar_topics_need_a_rule_naming_them() {
    let acl = acl("topic read #\ntopic read +/broker/#\n");
    assert!(acl.may_read(ANON, "c", "a/b"));
    assert!(!acl.may_read(ANON, "c", "$SYS/broker/load"));
    assert!(!acl.may_subscribe(ANON, "c", "$SYS/#"));
    assert!(acl.may_subscribe(ANON, "c", "#"));
    let acl = self::acl("topic read #\ntopic read $SYS/#\n");
    assert!(acl.may_read(ANON, "c", "$SYS/broker/load"));
    assert!(acl.may_subscribe(ANON, "c", "$SYS/#"));
    assert!(acl.may_subscribe(ANON, "c", "$SYS/broker/+"));
    let acl = self::acl("topic read #\ntopic deny $SYS/#\n");
    assert!(acl.may_subscribe(ANON, "c", "#"), "a deny rule on $SYS does not overlap #");
}

#[test]
fn a_subscription_must_be_covered_by_a_read_rule() {
    let acl = acl("topic read fieldmq/#\ntopic read one/+/x\n");
    let sub = |f| acl.may_subscribe(ANON, "c", f);
    assert!(sub("fieldmq/#"));
    assert!(sub("fieldmq"), "`#` covers its parent level");
    assert!(sub("fieldmq/+/x"));
    assert!(sub("fieldmq/a/b/c"));
    assert!(sub("fieldmq/+"));
    assert!(!sub("#"), "# reaches beyond fieldmq/#");
    assert!(!sub("+/x"));
    assert!(!sub("fieldmqx/#"));
    assert!(sub("one/+/x"));
    assert!(sub("one/a/x"));
    assert!(!sub("one/#"));
    assert!(!sub("one/+/#"));
    assert!(!sub("one/a"));
    assert!(!sub("one/a/x/y"));
}

#[test]
fn a_plus_hash_rule_covers_everything_hash_does() {
    let acl = acl("topic read +/#\n");
    assert!(acl.may_subscribe(ANON, "c", "#"));
    assert!(acl.may_subscribe(ANON, "c", "+"));
    assert!(acl.may_subscribe(ANON, "c", "a/#"));
    assert!(!acl.may_subscribe(ANON, "c", "$SYS/#"));
    let acl = self::acl("topic read a/+/#\n");
    assert!(!acl.may_subscribe(ANON, "c", "a/#"), "a/# matches a, a/+/# does not");
}

#[test]
fn write_rules_do_not_allow_subscribing() {
    let acl = acl("topic write a/#\n");
    assert!(!acl.may_subscribe(ANON, "c", "a/#"));
    assert!(!acl.may_read(ANON, "c", "a/b"));
}

#[test]
fn shared_subscriptions_are_checked_on_their_filter() {
    let acl = acl("topic read fieldmq/#\n");
    assert!(acl.may_subscribe(ANON, "c", "$share/workers/fieldmq/+/x"));
    assert!(acl.may_subscribe(ANON, "c", "$share/workers/fieldmq"));
    assert!(!acl.may_subscribe(ANON, "c", "$share/workers/#"));
    assert!(!acl.may_subscribe(ANON, "c", "$share/fieldmq"));
}

#[test]
fn errors_point_at_line_and_column() {
    let text = "# header\n\
                \n  frobnicate a/b\n\
                topic reed a/b\n\
                topic\n\
                topic read\n\
                pattern deny   \n\
                topic write a/#/b\n\
                user\n\
                \ttopic  sport+\n\
                topic read a/b\n";
    let got = errors(text);
    let lines: Vec<_> = got.iter().map(|(l, c, _)| (*l, *c)).collect();
    assert_eq!(lines, [(3, 3), (4, 7), (5, 6), (6, 11), (7, 13), (8, 13), (9, 5), (10, 9)], "{got:#?}");
    assert!(got[0].2.contains("unknown keyword `frobnicate`"), "{}", got[0].2);
    assert!(got[1].2.contains("unknown access `reed`"), "{}", got[1].2);
    assert!(got[2].2.contains("missing topic filter after `topic`"), "{}", got[2].2);
    assert!(got[3].2.contains("missing topic filter after `read`"), "{}", got[3].2);
    assert!(got[4].2.contains("missing topic filter after `deny`"), "{}", got[4].2);
    assert!(got[5].2.contains("invalid topic filter `a/#/b`"), "{}", got[5].2);
    assert!(got[6].2.contains("missing username"), "{}", got[6].2);
    assert!(got[7].2.contains("`sport+`"), "{}", got[7].2);
}

#[test]
fn errors_display_line_and_column_first_and_count_characters() {
    let got = Acl::parse("topic read café/x\ntopic read é/#/x\n").unwrap_err();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].to_string(),
        "line 2, column 12: invalid topic filter `é/#/x`: # must be the last level of a filter, alone"
    );
    let got = Acl::parse("  é topic a\r\n").unwrap_err();
    assert_eq!((got[0].line, got[0].column), (1, 3));
}

#[test]
fn comments_blank_lines_and_crlf_are_ignored() {
    let acl = acl("\r\n# comment\r\n   # indented comment\r\n\t\r\ntopic read a/b  \r\n");
    assert_eq!(acl.rule_count(), 1);
    assert!(acl.may_read(ANON, "c", "a/b"));
}

#[test]
fn anonymous_write_is_flagged() {
    let cases = [
        ("topic read #\n", false),
        ("topic write a\n", true),
        ("topic a\n", true),
        ("topic deny a\n", false),
        ("user u\ntopic readwrite #\n", false),
        ("pattern write d/%c\n", true),
        ("pattern readwrite d/%u\n", false),
        ("pattern read d/%c\n", false),
        ("user u\ntopic read x\npattern write d/%c/%u\npattern write a\n", true),
    ];
    for (text, expected) in cases {
        assert_eq!(acl(text).grants_anonymous_write(), expected, "{text}");
    }
}

fn level() -> impl Strategy<Value = String> {
    prop_oneof![Just("a".to_string()), Just("b".to_string()), Just("$s".to_string()), Just(String::new())]
}

/// A small valid filter: a few levels of `a`, `b`, `$s`, ``, `+`, maybe `/#`.
fn filter() -> impl Strategy<Value = String> {
    (proptest::collection::vec(prop_oneof![level(), Just("+".to_string())], 0..4), any::<bool>()).prop_map(
        |(levels, hash)| {
            let mut filter = levels.join("/");
            if hash {
                filter.push_str(if levels.is_empty() { "#" } else { "/#" });
            }
            if filter.is_empty() {
                filter.push('a');
            }
            filter
        },
    )
}

/// Every topic of one to five levels over `a`, `b`, `z`, `$s` and ``; `z`
/// is in no filter, so it stands for "any other level".
fn universe() -> &'static [String] {
    static UNIVERSE: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    UNIVERSE.get_or_init(|| {
        let words = ["a", "b", "z", "$s", ""];
        let mut all: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        let mut last = all.clone();
        for _ in 1..5 {
            last = last.iter().flat_map(|t| words.iter().map(move |w| format!("{t}/{w}"))).collect();
            all.extend(last.iter().cloned());
        }
        all.retain(|t| !t.is_empty());
        all
    })
}

proptest! {
    /// Coverage is exact: a rule covers a subscription if and only if it
    /// matches every topic the subscription matches (over topics a level
    /// longer than either, which is where a counter-example would show).
    #[test]
    fn coverage_is_exactly_topic_inclusion(rule in filter(), sub in filter()) {
        let who = Who::new(None, "c");
        let compiled = Rule::new(Access::Read, &rule, false);
        let sub_filter = TopicFilter::new(sub.clone()).unwrap();
        let rule_filter = TopicFilter::new(rule.clone()).unwrap();
        let included = universe().iter().all(|t| {
            let t = TopicName::new(t.clone()).unwrap();
            !sub_filter.matches(&t) || rule_filter.matches(&t)
        });
        prop_assert_eq!(compiled.covers(&sub, &who), included, "rule {} sub {}", rule, sub);
    }

    /// What the parsed rules allow agrees with the reference matcher of
    /// `topic.rs`, and a permitted subscription only brings readable topics.
    #[test]
    fn a_permitted_subscription_only_brings_readable_topics(
        rules in proptest::collection::vec((0..3usize, filter()), 1..4),
        sub in filter(),
    ) {
        let words = ["read", "write", "readwrite"];
        let text: String = rules.iter().map(|(a, f)| format!("topic {} {f}\n", words[*a])).collect();
        let acl = Acl::parse(&text).unwrap();
        let allowed = acl.may_subscribe(None, "c", &sub);
        let sub_filter = TopicFilter::new(sub.clone()).unwrap();
        let readable: Vec<TopicFilter> =
            rules.iter().filter(|(a, _)| *a != 1).map(|(_, f)| TopicFilter::new(f.clone()).unwrap()).collect();
        for t in universe() {
            let t = t.as_str();
            let topic = TopicName::new(t).unwrap();
            let reference = readable.iter().any(|f| f.matches(&topic));
            prop_assert_eq!(acl.may_read(None, "c", t), reference, "{} topic {}", text, t);
            if allowed && sub_filter.matches(&topic) {
                prop_assert!(acl.may_read(None, "c", t), "{} sub {} topic {}", text, sub, t);
            }
        }
    }
}
