package etcdstore

import "testing"

// FuzzDecodeRecords: a value read from etcd either fails to decode or
// decodes to records that encode and decode to the same records.
func FuzzDecodeRecords(f *testing.F) {
	f.Add([]byte(`[{"rr":"h.alice.btmm.example.\t60\tIN\tAAAA\tfd00::1","exp":1800000000000000000,"owner":"alice.btmm.example."}]`))
	f.Add([]byte(`[{"rr":"x. 1 IN TXT \"a\" \"b\""}]`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		recs, err := decodeRecords(data)
		if err != nil {
			return
		}
		again, err := decodeRecords(encodeRecords(recs))
		if err != nil {
			t.Fatalf("re-decode: %v", err)
		}
		if len(again) != len(recs) {
			t.Fatalf("%d records became %d", len(recs), len(again))
		}
		for i := range recs {
			if recs[i].Key() != again[i].Key() || refreshed(recs[i], again[i]) {
				t.Fatalf("record %d changed: %v -> %v", i, recs[i].RR, again[i].RR)
			}
		}
	})
}
