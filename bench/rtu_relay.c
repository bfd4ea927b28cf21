/*
 * rtu_relay: forwards bytes between two ttys, paced like a UART line.
 *
 * A pty moves a whole frame at once; an RS-485 line takes 11 bit times per
 * character (start, 8 data, parity or second stop, stop). Placed between the
 * gateway's pty and the device's, this relay lets each byte through no sooner
 * than one character time after the previous byte of the same direction, so
 * a cycle measured through it is a cycle at BAUD. Each direction has its own
 * thread and its own line (as with the two wire pairs of a full-duplex link;
 * on RS-485 the master and slave take turns anyway).
 *
 * Usage: rtu_relay [-v] [-e] GATEWAY_SIDE DEVICE_SIDE BAUD
 *   -e  hand each byte over at the end of its character time (when its stop
 *       bit would have been received) rather than at the start: a frame of N
 *       bytes then takes N character times, exactly the wire time, instead
 *       of N - 1.
 *   -v  one line per frame on stdout, times in ns on CLOCK_MONOTONIC:
 *       "frame DIR BYTES ARRIVED FIRST_SENT LAST_SENT" where DIR is "req"
 *       (gateway to device) or "rsp", ARRIVED is when the first byte was read
 *       and the SENT times are when the first and last bytes were written.
 *       A frame is a run of bytes with no idle line between them.
 * Prints "ready" once both ends are open.
 *
 * Build: gcc -O2 -pthread -o rtu_relay rtu_relay.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

/* clock_nanosleep wakes up late by the scheduler's latency (tens of us on a
 * busy machine), near a whole character at 115200 baud (95 us): the last
 * stretch before a deadline is spun instead. Short, so a 2-core machine
 * keeps its CPU for the gateway and the device. */
#define SPIN_NS 30000LL

static long long char_ns;
static int verbose, at_end;

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static long long now_ns(void)
{
    struct timespec t;
    if (clock_gettime(CLOCK_MONOTONIC, &t) != 0)
        die("clock_gettime");
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Absolute deadlines: time spent writing one byte does not push the next. */
static void sleep_until(long long deadline)
{
    for (;;) {
        long long left = deadline - now_ns();
        if (left <= 0)
            return;
        if (left > SPIN_NS) {
            long long wake = deadline - SPIN_NS;
            struct timespec t = { .tv_sec = wake / 1000000000LL, .tv_nsec = wake % 1000000000LL };
            int r = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL);
            if (r != 0 && r != EINTR) {
                errno = r;
                die("clock_nanosleep");
            }
        }
    }
}

static int open_raw(const char *path)
{
    int fd = open(path, O_RDWR | O_NOCTTY);
    if (fd < 0)
        die(path);
    struct termios t;
    if (tcgetattr(fd, &t) != 0)
        die("tcgetattr");
    cfmakeraw(&t);
    /* A read returns as soon as one byte is there: arrival times are exact. */
    t.c_cc[VMIN] = 1;
    t.c_cc[VTIME] = 0;
    if (tcsetattr(fd, TCSANOW, &t) != 0)
        die("tcsetattr");
    return fd;
}

struct direction {
    int src, dst;
    const char *name;
};

static void *forward(void *arg)
{
    const struct direction *d = arg;
    unsigned char buf[4096];
    long long idle_at = 0; /* when the last byte's character time ends */
    long long arrived = 0, first_sent = 0, last_sent = 0;
    long long frame = 0; /* bytes of the frame being sent */
    for (;;) {
        if (verbose && frame > 0) {
            /* The frame is over if the line goes idle with nothing to send. */
            long long left = idle_at - now_ns();
            struct timespec t = { 0, 0 };
            if (left > 0) {
                t.tv_sec = left / 1000000000LL;
                t.tv_nsec = left % 1000000000LL;
            }
            struct pollfd p = { .fd = d->src, .events = POLLIN };
            int r = ppoll(&p, 1, &t, NULL);
            if (r < 0 && errno != EINTR)
                die("ppoll");
            if (r == 0) {
                if (printf("frame %s %lld %lld %lld %lld\n", d->name, frame, arrived, first_sent, last_sent) < 0 ||
                    fflush(stdout) != 0)
                    die("stdout");
                frame = 0;
            }
            if (r <= 0)
                continue;
        }
        ssize_t got = read(d->src, buf, sizeof buf);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            die(d->name);
        if (got == 0) {
            fprintf(stderr, "rtu_relay: %s: end of input\n", d->name);
            exit(0);
        }
        long long now = now_ns();
        for (ssize_t i = 0; i < got; i++) {
            /* A byte that finds the line idle starts at once; the others
             * queue behind the previous byte's character time. */
            int idle = now >= idle_at;
            long long start = idle ? now : idle_at;
            if (idle) {
                if (verbose && frame > 0 && printf("frame %s %lld %lld %lld %lld\n", d->name, frame, arrived, first_sent,
                                        last_sent) < 0)
                    die("stdout");
                frame = 0;
                arrived = now;
            }
            sleep_until(at_end ? start + char_ns : start);
            ssize_t w;
            do
                w = write(d->dst, &buf[i], 1);
            while (w < 0 && errno == EINTR);
            if (w != 1)
                die("write");
            last_sent = now_ns();
            if (frame++ == 0)
                first_sent = last_sent;
            idle_at = start + char_ns;
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int opt;
    while ((opt = getopt(argc, argv, "ve")) != -1) {
        if (opt == 'v')
            verbose = 1;
        else if (opt == 'e')
            at_end = 1;
        else
            return 2;
    }
    if (argc - optind != 3) {
        fprintf(stderr, "usage: rtu_relay [-v] [-e] GATEWAY_SIDE DEVICE_SIDE BAUD\n");
        return 2;
    }
    char *end;
    long baud = strtol(argv[optind + 2], &end, 10);
    if (*end != '\0' || baud <= 0 || baud > 10000000) {
        fprintf(stderr, "rtu_relay: bad baud %s\n", argv[optind + 2]);
        return 2;
    }
    char_ns = 11LL * 1000000000LL / baud;
    /* The default 50 us timer slack alone would be half a character at
     * 115200. Threads inherit it. */
    if (prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL) != 0)
        die("prctl");
    /* The relay stands for hardware, which does not wait for a CPU: run
     * ahead of the gateway and the device where allowed (root). */
    struct sched_param sp = { .sched_priority = 10 };
    if (sched_setscheduler(0, SCHED_FIFO, &sp) != 0)
        perror("rtu_relay: SCHED_FIFO (pacing may be late under load)");
    int a = open_raw(argv[optind]), b = open_raw(argv[optind + 1]);
    static struct direction req, rsp;
    req = (struct direction){ a, b, "req" };
    rsp = (struct direction){ b, a, "rsp" };
    if (printf("ready\n") < 0 || fflush(stdout) != 0)
        die("stdout");
    pthread_t t;
    int r = pthread_create(&t, NULL, forward, &req);
    if (r != 0) {
        errno = r;
        die("pthread_create");
    }
    forward(&rsp);
    return 0;
}
