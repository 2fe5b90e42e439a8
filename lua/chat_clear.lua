-- chat_clear.lua: delete one chat history and forget its room.
-- KEYS[1]  chat list            KEYS[2]  the user's chat-room set
-- ARGV[1]  room id, encoded
-- Reply:   1 if a history was deleted, else 0
-- Forgetting the room frees its place under chat_max_rooms_per_user.

local n = redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return n
