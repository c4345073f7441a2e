package netmon

// scenario is one change of a host's network, run for real in network
// namespaces by TestRecordedScenariosNetNS (which can record it into
// testdata/recorded.json) and replayed from the recording by
// TestReplayRecorded.
type scenario struct {
	name string
	// script runs in the test's root namespace; $H, $G1, $G2 are the
	// namespaces of the host and its two gateways. The host starts behind
	// gw1 (eth0 192.168.1.2/24, default via 192.168.1.1).
	script string
	// major is whether the change must be Major; reason a substring of one
	// of its reasons; none that no change at all may be reported.
	major  bool
	reason string
	none   bool
}

var scenarios = []scenario{
	{
		name: "btmm's own objects are noise",
		script: `ip -n $H link add btmm0 type veth peer name btmm0p
ip -n $H addr add 10.77.0.1/24 dev btmm0
ip -n $H link set btmm0 up; ip -n $H link set btmm0p up
ip -n $H addr add fd00:1::1/128 dev eth0
ip -n $H -6 route add fd00:2::2/128 dev eth0 proto 98
ip -n $H route add 10.78.0.0/24 dev eth0 table 100`,
		none: true,
	},
	{
		name: "an unrelated link comes up",
		script: `ip -n $H link add docker0 type veth peer name docker0p
ip -n $H addr add 172.17.0.1/16 dev docker0
ip -n $H link set docker0 up; ip -n $H link set docker0p up`,
		reason: "off the default route",
	},
	{
		name: "new address from the same gateway",
		script: `ip -n $H addr del 192.168.1.2/24 dev eth0
ip -n $H addr add 192.168.1.3/24 dev eth0
ip -n $H route add default via 192.168.1.1`,
		major: true, reason: "outer address changed: 192.168.1.2 -> 192.168.1.3",
	},
	{
		name: "host moves behind another NAT",
		script: `ip -n $G1 link set lan netns $G2
ip -n $G2 addr add 192.168.2.1/24 dev lan
ip -n $G2 link set lan up
ip -n $H addr flush dev eth0
ip -n $H addr add 192.168.2.3/24 dev eth0
ip -n $H route add default via 192.168.2.1`,
		major: true, reason: "default route changed: via 192.168.1.1 dev eth0 src 192.168.1.3 -> via 192.168.2.1 dev eth0 src 192.168.2.3",
	},
	{
		name: "carrier flap on the default route's link",
		script: `ip -n $G2 link set lan down
ip -n $G2 link set lan up`,
		major: true, reason: "went down and up",
	},
	{
		name:   "offline",
		script: `ip -n $H link set eth0 down`,
		major:  true, reason: "gone (offline)",
	},
	{
		name: "online again",
		script: `ip -n $H link set eth0 up
ip -n $H route add default via 192.168.2.1`,
		major: true, reason: "appeared",
	},
}
