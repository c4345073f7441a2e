// Package llqclient is the client side of DNS Long-Lived Queries (RFC 8764)
// as RFC 6281 §5.3 uses them: the host asks once and the server pushes every
// change to the answer.
//
// A Client owns one UDP socket to the LLQ server (Config.Server, or found by
// SRV _dns-llq._udp.<domain>) and any number of watched questions:
//
//	c, err := llqclient.New(llqclient.Config{Domain: "alice.btmm.example.", Resolver: "192.0.2.53:53", Key: key}, logger)
//	go c.Run(ctx)
//	cancel := c.Watch("laptop.alice.btmm.example.", dns.TypeAAAA, func(rrs []dns.RR) { ... })
//
// For each question it runs the four-way setup (Initial Request, Challenge,
// Challenge Response, ACK + Answers; EDNS0 option 1, miekg/dns EDNS0_LLQ),
// refreshes at about half the granted lease with jitter, acknowledges every
// event (answers with TTL 0xFFFFFFFF are removals), and sets the LLQ up again
// when a refresh is answered NO-SUCH-LLQ or goes unanswered (a server restart
// or a lost LLQ). Requests are retransmitted after Timeout, doubling, Tries
// times in all. A server found by SRV that stops answering setups (it died)
// is dropped and the SRV looked up again, so with replicated servers the
// client moves to a live one.
//
// When the server does not speak LLQ (no LLQ option in its answer, as BIND),
// reports STATIC, SERV-FULL or another LLQ error, or does not answer setups,
// the question falls back to plain queries every PollInterval (with jitter)
// and tries LLQ again every RetryLLQ; Status says which questions are polled
// and why.
//
// The callback gets the complete current answer (never a delta), after the
// setup's ACK, after every event or poll that changed it; it runs on the
// client's goroutine, in order, and must not block. When the server is
// unreachable the last answer stands: nothing is withdrawn because the
// rendezvous server is down.
//
// With Config.Key every request and acknowledgement is TSIG-signed (RFC 6281
// §8) and every response and event must verify, else it is dropped.
package llqclient
