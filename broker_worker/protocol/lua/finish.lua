#!lua flags=allow-oom
-- Let go of a job's stream entry for good (it ran, was refused, or is a duplicate): acknowledge and delete it in
-- one step. Allowed while Redis is out of memory (the flag above; both commands free memory): inside MULTI,
-- Redis 7 refuses every command while it is, so an entry whose job ended during a memory shortage stayed pending
-- and was taken over again after every lease until memory was freed.
-- KEYS[1] the lane's job stream; ARGV[1] the consumer group, ARGV[2] the entry id. Returns XDEL's count.
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XDEL', KEYS[1], ARGV[2])
