/* Minimal UDP DNS responder for bench/run.sh: the CPU-per-query ceiling and a fast loopback
 * upstream. Every query is echoed back with QR (and RA) set, the question kept, any other
 * section dropped, and, for an A question, one A record appended whose owner is a
 * compression pointer to the question (0xC00C). It answers any name; it only ever sends to
 * the sender of a query. Datagrams are read and answered in batches (recvmmsg/sendmmsg, as
 * meshdns's server does), so its CPU per query is a floor for any server on this machine.
 *
 *   responder PORT [ANSWER_IP] [BIND_ADDR]   (defaults: answer 192.0.2.53, bind 127.0.0.1)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define BATCH 64

/* Turns the query in p (n bytes) into its answer in place; returns its length, 0 to drop. */
static size_t answer(unsigned char *p, size_t n, const struct in_addr *a) {
    if (n < 12 || (p[2] & 0x80) || p[4] != 0 || p[5] != 1) return 0; /* one question, a query */
    size_t i = 12;                                     /* walk the question's labels */
    while (i < n && p[i] != 0 && p[i] < 64) i += p[i] + 1;
    if (i + 5 > n || p[i] != 0) return 0;
    i += 5;                                            /* root label, QTYPE, QCLASS */
    int is_a = p[i - 4] == 0 && p[i - 3] == 1;
    p[2] = (p[2] & 0x79) | 0x80;                       /* QR; keep opcode and RD */
    p[3] = 0x80;                                       /* RA, RCODE 0 */
    p[6] = 0; p[7] = is_a;                             /* ANCOUNT */
    memset(p + 8, 0, 4);                               /* NSCOUNT, ARCOUNT */
    if (is_a) {                                        /* owner 0xC00C, A, IN, TTL 30, RDLEN 4 */
        static const unsigned char rr[12] = { 0xC0, 0x0C, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4 };
        memcpy(p + i, rr, sizeof rr);
        memcpy(p + i + 12, a, 4);
        i += 16;
    }
    return i;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s PORT [ANSWER_IP] [BIND_ADDR]\n", argv[0]); return 2; }
    struct in_addr a, bind_ip;
    if (!inet_aton(argc > 2 ? argv[2] : "192.0.2.53", &a) ||
        !inet_aton(argc > 3 ? argv[3] : "127.0.0.1", &bind_ip) ||
        (ntohl(bind_ip.s_addr) >> 24) != 127) {        /* loopback only */
        fprintf(stderr, "bad address (the bind address must be in 127.0.0.0/8)\n");
        return 2;
    }
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[1])), .sin_addr = bind_ip };
    int fd = socket(AF_INET, SOCK_DGRAM, 0), rcvbuf = 4 << 20;
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) { perror("bind"); return 1; }
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);

    static unsigned char buf[BATCH][512 + 16];         /* 512-byte queries, room for the A record */
    struct sockaddr_in from[BATCH];
    struct iovec in[BATCH], out[BATCH];
    struct mmsghdr rx[BATCH], tx[BATCH];
    for (;;) {
        for (int k = 0; k < BATCH; k++) {
            in[k] = (struct iovec){ buf[k], 512 };
            rx[k].msg_hdr = (struct msghdr){ .msg_name = &from[k], .msg_namelen = sizeof from[k],
                                             .msg_iov = &in[k], .msg_iovlen = 1 };
        }
        int got = recvmmsg(fd, rx, BATCH, MSG_WAITFORONE, NULL); /* blocks for the first only */
        if (got <= 0) continue;
        int m = 0;
        for (int k = 0; k < got; k++) {
            if (rx[k].msg_hdr.msg_flags & MSG_TRUNC) continue;
            size_t len = answer(buf[k], rx[k].msg_len, &a);
            if (!len) continue;
            out[m] = (struct iovec){ buf[k], len };
            tx[m].msg_hdr = (struct msghdr){ .msg_name = &from[k], .msg_namelen = rx[k].msg_hdr.msg_namelen,
                                             .msg_iov = &out[m], .msg_iovlen = 1 };
            m++;
        }
        for (int sent = 0; sent < m;) {                /* a full send buffer drops the rest */
            int r = sendmmsg(fd, tx + sent, m - sent, 0);
            if (r <= 0) break;
            sent += r;
        }
    }
}
